"""dirl.rollout."""
