from .op import rope_append

__all__ = ["rope_append"]
