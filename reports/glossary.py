"""The words of the report: glossary, references, readable headline labels, overview columns.

Plain words come first and symbols second. Papers are cited by title, authors or venue and year
(the report's references section, ``docs/MATH.md`` and the docstrings use the same list).
"""

from __future__ import annotations

GLOSSARY: tuple[tuple[str, str], ...] = (
    ("site", "one normalization layer or functional call (its module path, e.g. net.2)."),
    ("running statistics", "the mean and variance a BatchNorm stores during training and uses in eval mode."),
    ("population statistics", "the mean and variance of a layer's input over the whole data set."),
    ("mean drift", "how far the batch mean is from the running mean, in running standard deviations: |μ_B − μ_run| / √(σ²_run + ε)."),
    ("variance ratio", "batch variance over running variance, σ²_B / σ²_run; 1 when the running statistics are current."),
    ("eps share", "the part of the normalizer that is the constant ε: ε / (σ² + ε)."),
    ("R² (explained gradient)", "the share of the incoming gradient g = dL/dz that a straight-line fit α + βz on the normalized "
     "values explains; backpropagation through the normalization removes exactly that part."),
    ("naive-gradient gap", "how far (γ / s) dL/dy, which ignores that the batch moments depend on the input, is from the true dL/dx."),
    ("population gradient g*", "the gradient of a BatchNorm that normalizes with moments over the whole data set."),
    ("bias of an estimator", "||E ĝ − g*|| / ||g*||: how far the average minibatch gradient is from g*, with the "
     "Monte-Carlo noise removed; measurable when its 95% interval lies above the control's estimate (the noise floor)."),
    ("critical step a_crit", "2 ||d||² / dᵀHd: the largest step along direction d that still lowers the quadratic model of the loss."),
    ("λ_max", "the largest eigenvalue of the Hessian H (the sharpest curvature); gradient descent is stable for lr < 2 / λ_max."),
    ("parting step", "the step size from which the quadratic model and the real loss differ by more than 10%."),
    ("not measured", "a number the analysis does not have, with the reason: budget (the time budget cut the work; a larger "
     "--budget measures it), analyzer failed, not run (not selected with --analyzers), not applicable (running statistics of a "
     "kind that keeps none, the critical step of a site without parameters)."),
)

REFERENCES: tuple[tuple[str, str], ...] = (
    ("ioffe2015", "Sergey Ioffe and Christian Szegedy. Batch Normalization: Accelerating Deep Network Training by Reducing "
     "Internal Covariate Shift. ICML 2015."),
    ("ioffe2017", "Sergey Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized Models. NeurIPS 2017."),
    ("lsq2019", "Anonymous authors. Normalization Gradients are Least-Squares Residuals. Submitted to ICLR 2019."),
    ("extreme", "Anonymous authors. Extreme Normalization: Approximating Full-Data Batch Normalization with Single Examples. "
     "Under review (OpenReview)."),
    ("kohler2018", "Jonas Kohler, Hadi Daneshmand, Aurelien Lucchi, Ming Zhou, Klaus Neymeyr and Thomas Hofmann. Exponential "
     "Convergence Rates for Batch Normalization: The Power of Length-Direction Decoupling in Non-Convex Optimization. AISTATS 2019 "
     "(arXiv 2018)."),
    ("santurkar2018", "Shibani Santurkar, Dimitris Tsipras, Andrew Ilyas and Aleksander Madry. How Does Batch Normalization Help "
     "Optimization? NeurIPS 2018."),
    ("king2022", "Tyler King. Median Batch Normalization. Notes, 2022."),
    ("deb", "Aniruddha Deb. Batch Normalization. Notes."),
    ("deshmukh2020", "Rahul Deshmukh. Batch Norm. Notes, 2020."),
    ("yao2020", "Zhewei Yao, Amir Gholami, Kurt Keutzer and Michael Mahoney. PyHessian: Neural Networks Through the Lens of the "
     "Hessian. IEEE Big Data 2020."),
)

HEADLINE_LABELS: dict[str, str] = {
    "sites": "normalization sites",
    "eps_fraction_max": "largest eps share",
    "mean_drift_max": "largest mean drift (running std)",
    "var_ratio_min": "smallest variance ratio",
    "var_ratio_max": "largest variance ratio",
    "nonfinite": "NaN or Inf values",
    "gls_n_sites": "sites with a gradient",
    "gls_r2_mean": "mean R² over sites",
    "gls_naive_gap_max": "largest naive-gradient gap",
    "gls_identity_rel_max": "capture check (relative error)",
    "gls_small_batch": "smallest batch size swept",
    "gls_dist_plain_small": "small-batch gradient distance, plain",
    "gls_dist_regularized_small": "small-batch gradient distance, regularized",
    "bias_examples": "examples for the population gradient",
    "bias_population_gradient": "how g* was computed",
    "bias_jacobian_relative_gap": "two-stage gap on all examples",
    "bias_batchnorm_slope": "BatchNorm bias slope against B",
    "lr": "learning rate checked",
    "hvp_backend": "Hessian-vector products",
    "a_crit_train": "critical step, train mode",
    "a_crit_eval": "critical step, eval mode",
    "lambda_max_train": "λ_max, train mode",
    "lambda_max_eval": "λ_max, eval mode",
    "parting_step_train": "quadratic model holds to, train",
    "parting_step_eval": "quadratic model holds to, eval",
}

OVERVIEW_HEADERS: dict[str, str] = {
    "site": "site",
    "kind": "kind",
    "mean_drift": "mean drift (running std)",
    "var_ratio": "variance ratio (batch / running)",
    "eps_share": "eps share",
    "r2_median": "explained gradient (median R²)",
    "naive_gap": "naive-gradient gap",
    "lr_over_a_crit": "lr / a_crit",
    "verdict": "verdict",
}


def headline_label(key: str) -> str:
    """A readable label for a headline key (``bias_batchnorm_b4`` -> ``BatchNorm bias at batch size 4``)."""
    if key in HEADLINE_LABELS:
        return HEADLINE_LABELS[key]
    if key.startswith("bias_batchnorm_b") and key[len("bias_batchnorm_b"):].isdigit():
        return f"BatchNorm bias at batch size {key[len('bias_batchnorm_b'):]}"
    return key.replace("_", " ")
