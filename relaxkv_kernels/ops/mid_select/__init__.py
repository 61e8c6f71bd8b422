from .op import mid_select

__all__ = ["mid_select"]
