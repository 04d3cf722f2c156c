"""Input attributions of ensemble members: Saliency and Integrated Gradients.

``member_attributions(members, images, ...)`` returns ``(M, B, 3, H, W)`` maps, by our batched
autograd path (default) or through captum; ``compare_attribution_methods`` measures how far methods
agree on which member pairs differ (paper Figure 9).
"""

from divfast.attribution.agreement import compare_attribution_methods
from divfast.attribution.attribute import member_attributions

__all__ = ["compare_attribution_methods", "member_attributions"]
