"""Loading teachers in any supported format and building students."""
from .student import build_student, list_students, load_student
from .teacher import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher", "build_student", "load_student", "list_students"]
