"""Architecture families that live outside spec.py; each module registers its config builder on import."""
