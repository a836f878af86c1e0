"""Scripted experts on privileged simulator state (demonstrations for SFT)."""
