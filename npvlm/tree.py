"""The parameter tree: nested dicts (modules, named as Hugging Face names them) and lists (stacked
layers) whose leaves are arrays, e.g. `params["text"]["layers"][3]["self_attn"]["q_proj"]["weight"]`.

A leaf's path is its keys and list indices joined by dots, "text.layers.3.self_attn.q_proj.weight":
the name by which gradients, optimizers, save plans, LoRA and checkpoints address it. Every leaf
sits in a module dict under "weight" or "bias", so the path before the last dot names its module.

    flatten(tree)           {path: leaf}, in the tree's order (dicts as inserted, lists by index)
    unflatten(flat)         the tree back from {path: leaf}: numeric path parts make lists
    map_with_path(f, tree)  a tree of the same shape, each leaf replaced by f(path, leaf)

These three are the only walks over the tree; a gradient tree (the trained leaves only) and a
save plan are trees too.
"""


def flatten(tree, prefix=""):
    """{dotted path: leaf} of every leaf of a nested dict/list tree (None leaves are skipped)."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    elif tree is not None:
        out[prefix[:-1]] = tree
    return out


def unflatten(flat):
    """{"a.layers.0.b": x} -> {"a": {"layers": [{"b": x}]}}: the inverse of `flatten` (a dict whose
    keys are all 0..n-1 becomes a list)."""
    root = {}
    for path, leaf in flat.items():
        node = root
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf

    def listify(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node) and sorted(map(int, node)) == list(range(len(node))):
            return [listify(node[str(i)]) for i in range(len(node))]
        return {k: listify(v) for k, v in node.items()}
    return listify(root)


def map_with_path(fn, tree, prefix=""):
    """The tree with every leaf replaced by fn(path, leaf); dicts and lists are new, leaves are
    whatever fn returns (the same object to keep it)."""
    if isinstance(tree, dict):
        return {k: map_with_path(fn, v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_with_path(fn, v, f"{prefix}{i}.") for i, v in enumerate(tree)]
    return fn(prefix[:-1], tree)
