"""Loss terms of the five cross-lingual text-to-image alignment methods (IAP, PEA, MTN/GlueNet, cosine, AltDiffusion)."""
