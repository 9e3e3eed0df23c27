using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.Models.Tests;

/// <summary>A fact skipped, with the reason, until scripts/fixtures/make_bnb4bit.py's folders are committed.</summary>
public sealed class BnbFixtureFactAttribute : FactAttribute
{
    public BnbFixtureFactAttribute()
    {
        if (!Directory.Exists(BnbFixtureTests.Root()))
            Skip = $"no bitsandbytes-layout fixtures at {BnbFixtureTests.Root()}: on a machine with torch + safetensors run " +
                "`python3 scripts/fixtures/make_bnb4bit.py tests/LoRAHub.Models.Tests/fixtures/bnb4bit` and commit the folder";
    }
}

/// <summary>
/// Folders written by Python from bitsandbytes' format definition (an implementation independent of ours, see
/// make_bnb4bit.py) load into our 4-bit layers with the weights and logits of our own quantization of the same dense model.
/// </summary>
public sealed class BnbFixtureTests(Xunit.Abstractions.ITestOutputHelper output)
{
    public static string Root() => Path.Combine(ParityTests.FixtureRoot(), "bnb4bit");

    [BnbFixtureFact]
    public void Bitsandbytes_folders_load_with_the_logits_of_our_quantization()
    {
        var dense = Path.Combine(ParityTests.FixtureRoot(), "llama");
        foreach (var (name, type, dq) in new[] { ("nf4_dq", "nf4", true), ("fp4", "fp4", false) })
        {
            using var scope = torch.NewDisposeScope();
            using var loaded = PretrainedModel.Load(Path.Combine(Root(), name), ScalarType.Float32);
            var ours = new BitsAndBytesConfig { Bnb4bitQuantType = type, Bnb4bitUseDoubleQuant = dq, Bnb4bitComputeDtype = ScalarType.Float32 };
            using var reference = PretrainedModel.LoadIn4bit(dense, ours, ScalarType.Float32, torch.CPU);
            foreach (var (path, module) in loaded.Root.named_modules().Where(m => m.module is Linear4bit))
            {
                var a = ((Linear4bit)module).dense_weight(ScalarType.Float32);
                var b = ((Linear4bit)reference.Root.get_submodule(path)!).dense_weight(ScalarType.Float32);
                // Values exactly at a rounding threshold may round either way in two implementations; nearly all must agree.
                var differing = a.sub(b).abs().gt(1e-6).sum().item<long>();
                Assert.True(differing <= a.numel() / 1000, $"{name} {path}: {differing} of {a.numel()} weights dequantize differently");
            }
            var ids = torch.tensor(new long[,] { { 1, 5, 9, 13, 2, 40, 7, 3 } }); // both models are on the CPU
            var diff = TinyModels.MaxAbsDiff(loaded.Forward(ids), reference.Forward(ids));
            output.WriteLine($"{name}: max |logit difference| to our quantization {diff:E2}");
            Assert.True(diff < 1e-3f, $"{name}: logits differ by {diff}");
        }
    }
}
