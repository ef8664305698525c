"""The dataset's subject of each prompt, for the subject-locator probes (probe-subject-*.py):
prompt text -> subject, from the raw zsRE and CounterFact files under ../shared/data/raw."""
import json

RAW = "../shared/data/raw"


def subjects_of(task: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if task == "counterfact":
        for r in json.load(open(f"{RAW}/counterfact_easyedit/counterfact-edit.json")):
            out[r["prompt"]] = r["subject"]
        for r in json.load(open(f"{RAW}/mcounterfact_en/counterfact-train.json")):
            out[r["src"]] = r["subject"]
        for r in json.load(open(f"{RAW}/counterfact_rome_filtered/counterfact_filtered.json")):
            rw = r["requested_rewrite"]
            out[rw["prompt"].replace("{}", rw["subject"])] = rw["subject"]
    if task == "zsre":
        for r in json.load(open(f"{RAW}/knowedit_zsre/ZsRE-test-all.json")):
            out[r["prompt"]] = r["subject"]
    return out
