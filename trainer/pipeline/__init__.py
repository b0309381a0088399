"""The Beam pipeline's pieces: reading, parsing, de-duplicating and splitting ratings; generated data."""
