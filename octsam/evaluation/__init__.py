"""Evaluation: metrics (``metrics``, computation only), predicting a split and zero-shot (``predict``), comparing
methods (``compare``), the written results - CSVs, markdown report, protocol text (``report``) - and figures
(``plots``)."""
