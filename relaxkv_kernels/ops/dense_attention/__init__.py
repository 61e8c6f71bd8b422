from .op import dense_attention

__all__ = ["dense_attention"]
