"""Detectors: the ROC area is the Mann-Whitney statistic (as scikit-learn computes it), the threshold is
fixed on clean images at the false-positive rate asked, and the adaptive attack on classifier and
detector together drives detection down where the plain attack is partly detected."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from robustlab.attacks import create_attack
from robustlab.defenses.detection import (
    create_detector,
    detector_aware_pgd,
    evaluate_detection,
    roc_auc,
    scores,
    threshold_at,
)
from robustlab.errors import RobustlabError
from robustlab.threat import ThreatModel


def test_roc_auc_and_threshold():
    g = torch.Generator().manual_seed(0)
    neg, pos = torch.randn(300, generator=g), torch.randn(200, generator=g) + 1
    pos[:20] = neg[:20]  # ties
    expected = roc_auc_score([0] * 300 + [1] * 200, torch.cat([neg, pos]).numpy())
    assert roc_auc(neg, pos) == pytest.approx(expected, abs=1e-12)
    tau = threshold_at(neg, 0.05)
    assert (neg > tau).float().mean() <= 0.05 and (neg >= tau).float().mean() >= 0.05
    with pytest.raises(RobustlabError, match="false-positive rate"):
        threshold_at(neg, 1.5)


def test_detectors_check_their_parameters_and_training():
    with pytest.raises(RobustlabError, match="at least one squeezer"):
        create_detector("squeeze", bits=0, median=0)
    with pytest.raises(RobustlabError, match="not fitted"):
        create_detector("mahalanobis").score(torch.nn.Linear(4, 2), torch.rand(1, 4))
    with pytest.raises(RobustlabError, match="unknown detector"):
        create_detector("lid2")


def test_adaptive_attack_evades_the_mahalanobis_detector(digits_model, digits_train, digits_test):
    model = digits_model
    detector = create_detector("mahalanobis").fit(model, digits_train.x, digits_train.y)
    x, y = digits_test.x[:200], digits_test.y[:200]
    tau = threshold_at(scores(detector, model, digits_test.x[200:400]))  # fixed on clean images first
    clean = scores(detector, model, x)
    threat = ThreatModel("linf", 0.1)
    plain = create_attack("pgd", threat, steps=20).run(model, x, y, torch.Generator().manual_seed(0)).x_adv
    before = evaluate_detection(model, detector, x, y, plain, tau, clean, "pgd")
    adaptive = detector_aware_pgd(model, detector, x, y, threat, tau, steps=50, weight=2.0,
                                  generator=torch.Generator().manual_seed(0))
    after = evaluate_detection(model, detector, x, y, adaptive, tau, clean, "adaptive")
    assert threat.contains(adaptive, x).all()
    assert before.auc > 0.6 and before.detection_rate > 0.05  # the plain attack is partly detected
    assert after.detection_rate < before.detection_rate / 2 and after.fooled >= before.fooled


def test_magnet_autoencoder_scores_off_distribution_images_higher(digits_model, digits_train, digits_test):
    detector = create_detector("magnet", steps=600).fit(digits_model, digits_train.x[:600], digits_train.y[:600])
    clean = scores(detector, digits_model, digits_test.x[:100])
    noise = scores(detector, digits_model, torch.rand(100, *digits_test.x.shape[1:], generator=torch.Generator().manual_seed(0)))
    assert roc_auc(clean, noise) > 0.95
    with pytest.raises(RobustlabError, match="not fitted"):
        create_detector("magnet").score(digits_model, digits_test.x[:2])


def test_lid_detects_plain_pgd_and_falls_to_the_adaptive_attack(digits_model, digits_train, digits_test):
    """Ma et al.'s LID detector catches much of plain PGD; attacking classifier and detector together
    (Athalye et al. 2018) brings its detection rate near zero while fooling more points."""
    model = digits_model
    train_adv = create_attack("pgd", ThreatModel("linf", 0.1), steps=10).run(
        model, digits_train.x, digits_train.y, torch.Generator().manual_seed(1)).x_adv
    with pytest.raises(RobustlabError, match="adversarial examples of its training images"):
        create_detector("lid").fit(model, digits_train.x, digits_train.y)
    detector = create_detector("lid").fit(model, digits_train.x, digits_train.y, train_adv)
    x, y = digits_test.x[:200], digits_test.y[:200]
    tau = threshold_at(scores(detector, model, digits_test.x[200:400]))
    clean = scores(detector, model, x)
    threat = ThreatModel("linf", 0.1)
    plain = create_attack("pgd", threat, steps=20).run(model, x, y, torch.Generator().manual_seed(0)).x_adv
    before = evaluate_detection(model, detector, x, y, plain, tau, clean, "pgd")
    adaptive = detector_aware_pgd(model, detector, x, y, threat, tau, steps=50, weight=2.0,
                                  generator=torch.Generator().manual_seed(0))
    after = evaluate_detection(model, detector, x, y, adaptive, tau, clean, "adaptive")
    assert before.auc > 0.8 and before.detection_rate > 0.3
    assert after.detection_rate < 0.1 and after.fooled > before.fooled


def test_lid_mahalanobis_and_bit_depth_match_their_references(digits_model, digits_train, digits_test):
    """ART (1.20) has no LID or Mahalanobis detector, so both are checked against the formulas of the
    papers' own code, written out here in NumPy on the same features: Ma et al.'s ``mle_batch``
    (xingjunm/lid_adversarial_subspace_detection) and Lee et al.'s ``sample_estimator`` +
    ``get_Mahalanobis_score`` at noise magnitude 0 (pokaxpoka/deep_Mahalanobis_detector). The
    bit-depth squeezer is checked against ART's FeatureSqueezing."""
    import art.defences.detector.evasion as art_detectors
    import numpy as np
    import sklearn.covariance
    from art.defences.preprocessor import FeatureSqueezing as ArtSqueezing
    from scipy.spatial.distance import cdist

    from robustlab.defenses.detection import features, layer_features, lid

    assert not [n for n in dir(art_detectors) if "lid" in n.lower() or "mahalanobis" in n.lower()]
    model = digits_model
    with torch.no_grad():
        layers = layer_features(model, digits_test.x[:100])
    for f in layers:  # LID of a batch among itself, k = 20
        f64 = f.double().numpy()
        near = np.sort(cdist(f64, f64), axis=1)[:, 1:21]
        reference = -20 / np.log(near / near[:, -1:]).sum(axis=1)
        assert np.allclose(lid(f.double(), f.double(), 20, exclude_self=True).numpy(), reference, rtol=1e-8)

    x, y = digits_train.x, digits_train.y.numpy()
    with torch.no_grad():
        f = features(model, x).double().numpy()
        test_f = features(model, digits_test.x[:200]).double().numpy()
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    centred = np.concatenate([f[y == c] - means[c] for c in range(10)])
    precision = sklearn.covariance.EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    gaussian = np.stack([-0.5 * np.einsum("nd,de,ne->n", test_f - m, precision, test_f - m) for m in means], 1)
    detector = create_detector("mahalanobis", shrinkage=0.0).fit(model, x, digits_train.y)
    with torch.no_grad():
        ours = detector.score(model, digits_test.x[:200]).double().numpy()
    assert np.allclose(ours, -2 * gaussian.max(axis=1), rtol=1e-4)

    images = digits_test.x[:50]
    for bits in (1, 3, 5):
        art_out, _ = ArtSqueezing(clip_values=(0.0, 1.0), bit_depth=bits)(images.numpy())
        ours = create_detector("squeeze", bits=bits, median=0).squeezers()[0](images)
        assert np.array_equal(ours.numpy(), art_out.astype(np.float32))  # ART computes in float64
