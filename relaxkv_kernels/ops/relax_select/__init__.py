from .op import relax_select

__all__ = ["relax_select"]
