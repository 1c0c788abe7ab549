"""The method's core operations as plain functions on tensors and arrays (no Ray)."""
