"""dirl.eval."""
