"""Reports: the compression report, report files, summaries, CI gates and their renderings."""
