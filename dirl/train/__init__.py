"""dirl.train."""
