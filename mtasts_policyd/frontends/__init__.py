"""Thin protocol front ends: Postfix socketmap, Exim readsocket, and their listeners."""
