"""SONIC producers: event data to model inputs in acquire, model outputs to products in produce."""
