"""dirl.data."""
