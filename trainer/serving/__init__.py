"""Serving: the SavedModel export, the prediction server and batch recommendations."""
