"""Config groups only ``foundation data build`` composes (``engine=local|ray``): a search path
of their own, so the training config's ``engine`` group (deepspeed, fsdp) does not list them."""
