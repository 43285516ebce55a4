"""The Flax FID Inception against pytorch-fid's network and torch-fidelity's extractor (random weights, no download),
the two resizes against torch, and the converter's errors and command line."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
torch_fidelity_fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402

from graft_jax import checkpoints  # noqa: E402
from graft_jax.convert import cli  # noqa: E402
from graft_jax.convert.inception import inception_from_torch  # noqa: E402
from graft_jax.convert.state_dict import ConversionError, read_state_dict  # noqa: E402
from graft_jax.evaluation import inception  # noqa: E402


def fid_inception_random(seed: int = 0):
  """pytorch-fid's FIDInceptionV3 built as `fid_inception_v3()` does, but with random weights instead of a download.

  Conv weights are drawn with variance 2 / fan_in and the batch-norm statistics are random, so activations keep
  their scale through all 94 layers and every parameter (including running mean and variance) is exercised."""
  torch.manual_seed(seed)
  fid = pytorch_fid_inception
  net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=True)
  net.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = fid.FIDInceptionE_1(1280)
  net.Mixed_7c = fid.FIDInceptionE_2(2048)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      elif isinstance(m, torch.nn.Linear):
        m.weight.normal_(0.0, 2048 ** -0.5)
        m.bias.normal_(0.0, 1.0)
  return net.eval()


def torch_outputs(net, x_nchw):
  """pool3, logits, logits_unbiased, spatial (mixed_6/conv, first 7 channels, flattened h, w, c) of a torch net."""
  captured = {}
  hooks = [net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("mixed_6", o)),
           net.Mixed_7c.register_forward_hook(lambda m, i, o: captured.__setitem__("mixed_10", o))]
  try:
    with torch.no_grad():
      logits = net(x_nchw)
  finally:
    for h in hooks:
      h.remove()
  logits = logits[0] if isinstance(logits, tuple) else logits
  pool3 = captured["mixed_10"].mean(dim=(2, 3))
  spatial = captured["mixed_6"].permute(0, 2, 3, 1)[..., :7].reshape(len(x_nchw), -1)
  unbiased = pool3 @ net.fc.weight.T
  return {"pool3": pool3.numpy(), "logits": logits.numpy(), "logits_unbiased": unbiased.detach().numpy(),
          "spatial": spatial.numpy()}


def assert_close(ours, ref, rtol, name):
  err = np.abs(np.asarray(ours, np.float64) - ref).max()
  scale = np.abs(ref).max()
  assert scale > 0, name
  assert err <= rtol * scale, f"{name}: max abs error {err:.3g}, relative {err / scale:.3g}"
  return err, err / scale


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch net, weight file, converted folder): the .pth converted through the real command line."""
  tmp = tmp_path_factory.mktemp("inception")
  net = fid_inception_random()
  pth = tmp / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(net.state_dict(), pth)
  assert cli.main([str(pth), str(tmp / "inception")]) == 0
  return net, pth, tmp / "inception"


@pytest.fixture(scope="module")
def images():
  # Small non-square uint8 images: the resize is part of what is compared, and 2 x 299 x 299 is all the network sees.
  return np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ours(converted, images):
  model, params = checkpoints.load(converted[2])
  assert isinstance(model, inception.InceptionV3)
  feats = inception.features(model, params, images, "tf1", batch_size=2)
  # features() leaves out the biased logits (nothing uses them); they are the unbiased ones plus the saved bias.
  return {**feats, "logits": feats["logits_unbiased"] + np.asarray(params["fc"]["bias"])}


def test_matches_pytorch_fid_network(converted, images, ours):
  """The full network on the TF1-resized input: every output within 1e-5 of pytorch-fid's FIDInceptionV3."""
  net, _, _ = converted
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
  ref = torch_outputs(net, x)
  assert ours["pool3"].shape == (2, 2048) and ours["spatial"].shape == (2, 17 * 17 * 7)
  assert np.std(ref["spatial"]) > 0.1 and np.std(ref["pool3"]) > 0.1  # random weights that keep activations alive
  errors = {k: assert_close(ours[k], ref[k], 1e-5, k) for k in ("pool3", "logits_unbiased", "logits", "spatial")}
  print("parity vs pytorch-fid (max abs, relative):", errors)


def test_matches_torch_fidelity_extractor(converted, images, ours):
  """torch-fidelity reads the same weight file and resizes like TF1: its pool3 and both logits match ours."""
  _, pth, _ = converted
  fe = torch_fidelity_fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                     feature_extractor_weights_path=str(pth))
  pool3, unbiased = fe(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  print("parity vs torch-fidelity (max abs, relative):",
        assert_close(ours["pool3"], pool3.numpy(), 1e-5, "pool3"),
        assert_close(ours["logits_unbiased"], unbiased.numpy(), 1e-5, "logits_unbiased"))


@pytest.mark.parametrize("size", [(40, 56), (299, 299), (512, 384), (7, 300)])
def test_tf1_resize_matches_torch_fidelity(size):
  x = np.random.default_rng(1).uniform(0, 255, (2, *size, 3)).astype(np.float32)
  ours = np.asarray(inception.resize(x, 299, "tf1"))
  ref = interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                                                  align_corners=False).permute(0, 2, 3, 1).numpy()
  assert ours.shape == (2, 299, 299, 3)
  # Bit-exact on CPU when measured; the tolerance (one float32 ulp at 255) leaves room for a compiler's FMA.
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("size", [(40, 56), (512, 384), (7, 300)])
def test_torch_resize_matches_pytorch_fid_pipeline(size):
  """'torch' mode is pytorch-fid's input pipeline: [0, 1] images, F.interpolate bilinear, then 2x - 1."""
  x = np.random.default_rng(2).integers(0, 256, (2, *size, 3), dtype=np.uint8)
  ours = np.asarray(inception.preprocess(x, "torch"))
  t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
  ref = 2 * torch.nn.functional.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
  # The two resizes differ (by up to half a source pixel): the mode is a real choice.
  assert np.abs(np.asarray(inception.preprocess(x, "tf1")) - ours).max() > 0.05


def test_converter_errors(converted):
  _, pth, _ = converted
  tensors, _ = read_state_dict(pth)
  missing = {k: v for k, v in tensors.items() if k != "Mixed_6d.branch1x1.bn.running_var"}
  with pytest.raises(ConversionError, match="missing Mixed_6d.branch1x1.bn.running_var"):
    inception_from_torch(missing)
  with pytest.raises(ConversionError, match="1 checkpoint keys were not used: AuxLogits.fc.weight"):
    inception_from_torch({**tensors, "AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  imagenet = {**tensors, "fc.weight": np.zeros((1000, 2048), np.float32), "fc.bias": np.zeros(1000, np.float32)}
  with pytest.raises(ConversionError, match=r"fc\.(weight|bias) has shape \(1000"):
    inception_from_torch(imagenet)
  with pytest.raises(ConversionError, match="not an FID Inception"):
    inception_from_torch({"x_embedder.proj.weight": np.zeros((4, 4, 2, 2), np.float32)})
  # num_batches_tracked is optional: the weight file without it converts to the same parameters.
  bare = {k: v for k, v in tensors.items() if not k.endswith("num_batches_tracked")}
  assert len(bare) < len(tensors)
  _, params = inception_from_torch(bare)
  np.testing.assert_array_equal(params["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
                                tensors["Mixed_6d.branch1x1.conv.weight"].transpose(2, 3, 1, 0))


def test_cli_refuses_existing_output(converted, capsys):
  _, pth, folder = converted
  assert cli.main([str(pth), str(folder)]) == 2
  assert "already exists" in capsys.readouterr().err
