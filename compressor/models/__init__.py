"""Loading teachers in any supported format and building students."""
from .registry import get_student, list_students, register_student
from .student import build_student, load_student
from .teacher import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher", "build_student", "load_student", "list_students", "register_student", "get_student"]
