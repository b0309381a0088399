"""The top-N model: implicit-feedback ALS on which movies users rated, its ranking metrics and the catalog."""
