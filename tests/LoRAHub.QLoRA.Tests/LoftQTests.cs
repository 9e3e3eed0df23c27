using System.Text.Json;
using LoRAHub.TorchExtensions.Modules;
using Linear = TorchSharp.Modules.Linear;

namespace LoRAHub.QLoRA.Tests;

/// <summary>
/// init_lora_weights "loftq" (PEFT's LoftQ): the 4-bit base and the adapter are chosen together, so Q + s·B·A is closer
/// to the full-precision W than plain NF4 with a zero adapter, and closer still with more alternating iterations.
/// </summary>
public class LoftQTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly string Compute = TestDevice.IsCuda ? "bfloat16" : "float32";

    // A weight shaped like a trained one: a strong low-rank part, small noise and a few outliers.
    private static Tensor Weight(long seed = 3)
    {
        torchx.manual_seed(seed);
        var w = randn(128, 4).mm(randn(4, 256)).mul(0.05) + randn(128, 256).mul(0.01);
        w[5, 7] = 0.8f;
        w[77, 200] = -0.6f;
        return w.to(Dev);
    }

    private static double PlainNf4Error(Tensor w)
    {
        var quantize = LoftQ.FourBitRoundTrip();
        using var deq = quantize(w);
        using var zero = zeros(1, w.size(1), device: w.device);
        using var zeroB = zeros(w.size(0), 1, device: w.device);
        return LoftQ.RelativeError(w, deq, zero, zeroB, 1);
    }

    private static double LoftQError(Tensor w, int iterations, double scaling = 2)
    {
        var (input, deq, a, b) = LoftQ.Run(w, 8, scaling, iterations, LoftQ.FourBitRoundTrip());
        try
        {
            return LoftQ.RelativeError(w, deq, a, b, scaling);
        }
        finally
        {
            input.Dispose();
            deq.Dispose();
            a.Dispose();
            b.Dispose();
        }
    }

    [Fact]
    public void LoftQ_approximates_the_weight_better_than_plain_nf4_and_improves_with_iterations()
    {
        using var w = Weight();
        var plain = PlainNf4Error(w);
        var one = LoftQError(w, 1);
        var five = LoftQError(w, 5);
        output.WriteLine($"relative error: plain NF4 {plain:G4}, LoftQ 1 iteration {one:G4}, 5 iterations {five:G4}");
        Assert.True(one < plain, $"LoftQ (1 iteration) error {one:G4} should be below plain NF4's {plain:G4}");
        Assert.True(five < one, $"5 iterations ({five:G4}) should beat 1 ({one:G4})");
        // The scale only splits the factors: Q and s·B·A are the same for any lora_alpha.
        Assert.Equal(one, LoftQError(w, 1, scaling: 0.5), 5);
    }

    [Fact]
    public void The_quantize_tensor_gives_exactly_the_chosen_base()
    {
        using var w = Weight();
        var (input, deq, a, b) = LoftQ.Run(w, 8, 2, 3, LoftQ.FourBitRoundTrip("nf4", 64, doubleQuant: true));
        using var q = LoRAHub.TorchExtensions.Quantization.FourBit.Quantize(input, "nf4", 64, true);
        using var again = q.Dequantize(ScalarType.Float32);
        Assert.True(again.equal(deq).all().item<bool>());
        foreach (var t in new[] { input, deq, a, b }) t.Dispose();
    }

    private static QLoraOptions Options(int iterations, LoraInit? init = null) => new()
    {
        R = 8, LoraAlpha = 16, Bnb4bitComputeDtype = Compute, Device = Dev.ToString(), InitLoraWeights = init ?? LoraInit.LoftQ,
        LoftqConfig = init is null ? new() { ["loftq_bits"] = 4, ["loftq_iter"] = iterations } : new(),
    };

    // Mean over the adapted layers of ‖W − (Q + s·B·A)‖ / ‖W‖, W from an untouched copy of the model.
    private static double LayerError(TinyModel original, QLoraAdapter adapter)
    {
        var errors = new List<double>();
        foreach (var path in adapter.QuantizedPaths)
        {
            var layer = adapter.Lora.Layers[path];
            var w = ((Linear)original.get_submodule(path)!).weight!.to(Dev);
            using var deq = ((Linear4bit)layer.base_layer).dense_weight(ScalarType.Float32);
            errors.Add(LoftQ.RelativeError(w, deq, layer.A("default"), layer.B("default"), layer.Scaling("default")));
        }
        return errors.Average();
    }

    [Fact]
    public void QLoRA_with_loftq_beats_plain_qlora_and_save_load_recreates_the_base()
    {
        using var original = Tiny.Model(seed: 4);
        using var plainModel = Tiny.Model(seed: 4);
        using var plain = (QLoraAdapter)new QLoraMethod().Attach(plainModel, Options(1, LoraInit.Default));
        using var loftModel = Tiny.Model(seed: 4);
        using var loft = (QLoraAdapter)new QLoraMethod().Attach(loftModel, Options(2));
        Assert.True(LayerError(original, loft) < LayerError(original, plain),
            $"LoftQ layer error {LayerError(original, loft):G4} should be below plain QLoRA's {LayerError(original, plain):G4}");

        // The model's output is closer to the full-precision model's.
        var x = Tiny.Batch(device: Dev);
        original.to(Dev);
        using var reference = original.Forward(x);
        using (no_grad())
        {
            var loftDiff = (loftModel.Forward(x) - reference).abs().mean().item<float>();
            var plainDiff = (plainModel.Forward(x) - reference).abs().mean().item<float>();
            Assert.True(loftDiff < plainDiff, $"LoftQ output error {loftDiff:G4} should be below plain QLoRA's {plainDiff:G4}");
        }

        var dir = Path.Combine(Path.GetTempPath(), "lorahub-qlora-tests", Guid.NewGuid().ToString("N"));
        loft.Save(dir);
        var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json"))).RootElement;
        Assert.Equal("loftq", config.GetProperty("init_lora_weights").GetString());
        Assert.Equal(2, config.GetProperty("loftq_config").GetProperty("loftq_iter").GetInt32());
        using var fresh = Tiny.Model(seed: 4);
        using var loaded = new QLoraMethod().Load(fresh, dir, Dev.ToString()); // quantized onto the test device, as loftModel was
        using (no_grad())
            Assert.True(fresh.Forward(x).allclose(loftModel.Forward(x), 1e-5, 1e-5), "loading must recreate the LoftQ base");
    }

    [Fact]
    public void LoRA_with_loftq_on_a_dense_base_writes_the_dequantized_base_as_peft_does()
    {
        using var original = Tiny.Model(seed: 5);
        using var model = Tiny.Model(seed: 5);
        var options = new LoraOptions
        {
            R = 8, LoraAlpha = 8, TargetModules = new[] { "q_proj" }, InitLoraWeights = LoraInit.LoftQ,
            LoftqConfig = new() { ["loftq_bits"] = 4, ["loftq_iter"] = 1 },
        };
        using var adapter = LoraAdapter.Build(new QLoraMethod(), model, a => a.AddAdapter(LoraAdapter.DefaultName, options));
        foreach (var path in adapter.Layers.Keys)
        {
            var w = ((Linear)original.get_submodule(path)!).weight!;
            var layer = adapter.Layers[path];
            var baseWeight = layer.base_linear.dense_weight();
            using var expected = LoftQ.FourBitRoundTrip()(w);
            Assert.True(baseWeight.equal(expected).all().item<bool>(), "the base must be the dequantized NF4 weight");
            Assert.True(LoftQ.RelativeError(w, baseWeight, layer.A("default"), layer.B("default"), layer.Scaling("default")) <
                        LoftQ.RelativeError(w, baseWeight, zeros_like(layer.A("default")), zeros_like(layer.B("default")), 1));
        }
    }

    [Theory]
    [InlineData("{}", "must be set")]
    [InlineData("""{"loftq_bits": 8, "loftq_iter": 1}""", "only 4-bit")]
    [InlineData("""{"loftq_bits": 4, "loftq_iter": 0}""", "at least 1")]
    public void Bad_loftq_configs_are_refused_naming_loftq_config(string config, string expected)
    {
        using var model = Tiny.Model();
        var options = Options(1);
        options.LoftqConfig = JsonSerializer.Deserialize<Dictionary<string, int>>(config)!;
        var e = Assert.Throws<AdapterConfigurationException>(() => new QLoraMethod().Attach(model, options));
        Assert.Contains("loftq_config", e.Message);
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain(model.named_modules(), m => m.module is Linear4bit); // refused before anything was quantized
    }
}
