"""docs/errors.md is generated from the robustness tables (tests/make_errors_doc.py): a new case
or a changed message needs the doc regenerated."""

from helpers import ROOT
from make_errors_doc import CASES, FINETUNE_CASES, _cell, message_templates


def test_errors_doc_lists_every_case():
    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    stale = [c.id for c in CASES if c.what not in doc
             or (c.api and not c.needs_no_gpu and c.api[1] not in doc)]
    stale += [c.id for c in FINETUNE_CASES if c.what not in doc or c.error[1] not in doc]
    assert not stale, f"docs/errors.md is stale for {stale}; run python tests/make_errors_doc.py"


def test_case_ids_are_unique():
    ids = [c.id for c in CASES] + [c.id for c in FINETUNE_CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_errors_doc_lists_every_message_the_code_can_raise():
    """Read from the code, not from the tables: a new `raise InputError(...)` anywhere in npvlm/
    must appear in docs/errors.md's list (regenerate it)."""
    doc = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
    templates = message_templates()
    assert len(templates) > 100, len(templates)            # the scan sees npvlm's messages
    missing = [f"{module}.{function}: {text}" for module, function, text in templates
               if f"| `{module}.{function}` | {_cell(text)} |" not in doc]
    assert not missing, (f"docs/errors.md lacks {len(missing)} message(s), e.g. {missing[:3]}; "
                         "run python tests/make_errors_doc.py")
