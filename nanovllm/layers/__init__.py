"""The building blocks of a decoder layer, each in its own file: norm, rotary, activation, attention, sampler."""
