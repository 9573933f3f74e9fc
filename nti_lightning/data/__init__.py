"""Inputs of a run: images, their ids and captions, decoded to pixels."""
