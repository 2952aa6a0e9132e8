"""dirl.rewards."""
