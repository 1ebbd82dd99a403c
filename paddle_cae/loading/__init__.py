"""From weights and run configurations to models: building classifiers from a run's config
(classifier) and loading checkpoints into them (pretrained: key mapping, table resizing,
strict loading of this package's own checkpoints)."""
