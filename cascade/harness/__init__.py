"""The top floor: the quality benchmark and its report, the judge classifier, and the end-to-end demo."""
