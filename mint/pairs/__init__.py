"""Preference pairs, from rows to batches: the one home of the student's training data.

- `rows`: read and validate TRL-format rows, split off validation rows;
- `text`: tokenize text rows (safe truncation) and the unpacked collator;
- `packed`: the packed [prompt, chosen, rejected] layout and the length-grouped sampler;
- `vision`: encode an image with its pair, and the image collator;
- `loaders`: the DataLoaders the student stage trains and validates with.
Which of `text`/`vision` a run uses is its student kind's choice (mint/student/kinds.py).
"""
