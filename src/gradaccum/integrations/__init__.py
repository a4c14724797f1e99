"""Adapters for the frameworks people train with; each module needs its framework's extra
(``gradaccum[accelerate]``) and is imported on its own: ``from gradaccum.integrations.accelerate
import accumulator``."""
