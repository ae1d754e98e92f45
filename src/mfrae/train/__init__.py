"""Training: one engine (`mfrae.train.engine`) for every stage (`mfrae.train.stages`), configured by
`mfrae.train.config`."""
