"""JUnit XML of the gates, one <testcase> per gate, so CI systems (GitLab, Jenkins, GitHub test reporters) show
gate results natively: a failed gate is a <failure>, a gate the report cannot answer is an <error>.

The layout satisfies both widely used schemas: Jenkins' (xunit-plugin junit-10) and Ant's (every testsuite has
name, tests, failures, errors, skipped, time, timestamp, hostname, and properties, system-out, system-err).
"""

import socket
import xml.etree.ElementTree as ET

from .. import __version__
from .files import utc_now

CLASSNAME = "lowrank.report"


def to_junit(runs, results, summary_text):
    """The JUnit document (str) for gate `results` evaluated on the last of `runs`."""
    run = runs[-1]
    failures = sum(r["status"] == "fail" for r in results)
    errors = sum(r["status"] == "missing" for r in results)
    counts = {"tests": str(len(results)), "failures": str(failures), "errors": str(errors), "skipped": "0",
              "time": "0"}
    root = ET.Element("testsuites", {"name": "lowrank report", **counts})
    stamp = utc_now().strftime("%Y-%m-%dT%H:%M:%S")  # Ant's schema takes no time zone
    suite = ET.SubElement(root, "testsuite", {"name": CLASSNAME, **counts, "timestamp": stamp,
                                              "hostname": socket.gethostname() or "localhost"})
    properties = ET.SubElement(suite, "properties")
    values = {"report": run["report_file"], "kind": run["kind"], "schema": f"{run['schema']} v{run['schema_version']}",
              "lowrank": __version__}
    if len(runs) > 1:
        values["compared_with"] = runs[0]["report_file"]
    if run["evaluations"]:
        values["protocol"] = run["evaluations"][-1]["protocol"]["statement"]
        values["data"] = f"{run['evaluations'][-1]['data']['source']} sha256 " \
                         f"{run['evaluations'][-1]['data']['sha256_text']}"
    for name, value in values.items():
        ET.SubElement(properties, "property", {"name": name, "value": str(value)})
    for result in results:
        name = f"{result['option']} {result['op']} {result['threshold_text']}"
        case = ET.SubElement(suite, "testcase", {"name": name, "classname": CLASSNAME, "time": "0"})
        if result["status"] == "fail":
            element = ET.SubElement(case, "failure", {"message": result["message"], "type": "GateFailed"})
            element.text = result["message"]
        elif result["status"] == "missing":
            element = ET.SubElement(case, "error", {"message": result["message"], "type": "ReportIncomplete"})
            element.text = result["message"]
        else:
            ET.SubElement(case, "system-out").text = result["message"]
    ET.SubElement(suite, "system-out").text = summary_text
    ET.SubElement(suite, "system-err").text = ""
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
