from .op import quantize_frames

__all__ = ["quantize_frames"]
