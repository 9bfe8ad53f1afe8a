"""The package version, in a module of its own: modules inside the package import it from here (not from the
package __init__, which would make every one of them part of an import cycle with it). Keep it equal to
pyproject.toml's [project] version."""
__version__ = "0.1.0"
