"""Writing files: a parameter tree -> a checkpoint in the layout it was loaded from
(`checkpoint`), and atomic writes for every file npvlm writes (`atomic`)."""
