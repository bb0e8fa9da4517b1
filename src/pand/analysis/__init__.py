"""Analysis commands: hyper-parameter sweeps with a results table and plot, and t-SNE views of student features.

    pand.analysis.sweep   expand_sweep, run_sweep, gather_runs   (``pand sweep``, ``pand gather``)
    pand.analysis.tsne    student_features, tsne_compare         (``pand tsne``)

The submodules import torch / matplotlib / scikit-learn lazily enough that importing this package stays cheap.
"""
