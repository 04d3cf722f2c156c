"""Input attributions of ensemble members: Saliency and Integrated Gradients.

``member_attributions(members, images, ...)`` returns ``(M, B, 3, H, W)`` maps, by our batched
autograd path (default) or through captum.
"""

from divfast.attribution.attribute import member_attributions

__all__ = ["member_attributions"]
