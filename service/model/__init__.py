"""The frozen base model."""
