using LoRAHub.Models;
using LoRAHub.Models.Llama;
using LoRAHub.TorchExtensions.Modules;

namespace LoRAHub.QLoRA.Tests;

/// <summary>QLoRA on a model loaded 4-bit (quantized while loading), and a merged QLoRA model saved in bitsandbytes' layout.</summary>
public class LoadIn4bitTests
{
    private static readonly Device Dev = TestDevice.Current;
    private static readonly ScalarType Compute = TestDevice.IsCuda ? ScalarType.BFloat16 : ScalarType.Float32;

    private static string Folder(string? path = null)
    {
        var dir = path ?? Path.Combine(Path.GetTempPath(), "lorahub-qlora-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        return dir;
    }

    private static string DenseLlama()
    {
        var folder = Folder();
        var config = new LlamaConfig
        {
            VocabSize = 64, HiddenSize = 64, IntermediateSize = 128, NumHiddenLayers = 2, NumAttentionHeads = 4, NumKeyValueHeads = 2,
            MaxPositionEmbeddings = 64,
        };
        using var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, CPU, 3);
        PretrainedModel.Save(model, folder);
        return folder;
    }

    [Fact]
    public void Qlora_trains_on_a_model_quantized_while_loading_and_saves_merged_in_bitsandbytes_layout()
    {
        var dense = DenseLlama();
        var saved = Folder();
        try
        {
            using var scope = NewDisposeScope();
            var bnb = new BitsAndBytesConfig { Bnb4bitComputeDtype = Compute };
            using var model = PretrainedModel.LoadIn4bit(dense, bnb, Compute, Dev);
            torchx.manual_seed(1);
            var ids = randint(64, [2, 8], device: Dev);
            var before = model.Forward(ids).to(ScalarType.Float32);
            var options = new QLoraOptions
            {
                R = 4, LoraAlpha = 8, Bnb4bitComputeDtype = Compute == ScalarType.BFloat16 ? "bfloat16" : "float32", Device = Dev.ToString(),
                TargetModules = new[] { "q_proj", "v_proj", "down_proj" },
            };
            var log = new List<string>();
            using var adapter = (QLoraAdapter)new QLoraMethod { Log = log.Add }.Attach(model, options);
            Assert.Equal(14, adapter.QuantizedPaths.Count);
            Assert.Contains(log, l => l.Contains("loaded 4-bit; nothing to quantize"));
            Assert.IsType<Linear4bit>(((LoraLinear)model.Root.get_submodule("model.layers.0.self_attn.q_proj")!).base_layer);
            Assert.True(TinyModels.MaxAbsDiff(model.Forward(ids).to(ScalarType.Float32), before) < 1e-6f, "B = 0 at init: the base output");

            // A few steps change the adapter; the merged model, saved 4-bit, loads with nearly the merged logits.
            model.Root.train();
            var groups = adapter.ParameterGroups(1e-2, 0);
            using var optimizer = new LoRAHub.TorchExtensions.Optim.AdamW(groups);
            for (var step = 0; step < 3; step++)
            {
                optimizer.zero_grad();
                model.ComputeLoss(ids, ids).backward();
                optimizer.step();
            }
            model.Root.eval();
            var merged = adapter.MergeAndUnload<ICausalLanguageModel>();
            var mergedLogits = merged.Forward(ids).to(ScalarType.Float32);
            Assert.True(TinyModels.MaxAbsDiff(mergedLogits, before) > 1e-3f, "training moved the model");
            PretrainedModel.SaveIn4bit(merged, saved, bnb);
            using var reloaded = PretrainedModel.Load(saved, Compute, Dev);
            Assert.IsType<Linear4bit>(reloaded.Root.get_submodule("model.layers.1.mlp.up_proj"));
            var error = TinyModels.MaxAbsDiff(reloaded.Forward(ids).to(ScalarType.Float32), mergedLogits);
            var scale = mergedLogits.abs().max().item<float>();
            Assert.True(error < 0.2f * scale, $"4-bit round trip of the merged model off by {error} (logits up to {scale})");
        }
        finally
        {
            Directory.Delete(dense, true);
            Directory.Delete(saved, true);
        }
    }
}

internal static class TinyModels
{
    public static float MaxAbsDiff(Tensor a, Tensor b)
    {
        using var d = (a - b).abs().max();
        return d.item<float>();
    }
}

/// <summary>QLoRA quantizes Phi-3's fused projections and Mixtral's experts and router, and puts LoRA on them.</summary>
public class QLoraFamilyTests
{
    [Theory]
    [InlineData("phi3", "model.layers.0.self_attn.qkv_proj", 2 * 4)]
    [InlineData("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3", 2 * (4 + 3 * 3 + 1))]
    public void Fused_projections_and_experts_are_quantized_and_adapted(string modelType, string adapted, int quantized)
    {
        using var scope = NewDisposeScope();
        var config = new LlamaConfig
        {
            ModelType = modelType, VocabSize = 64, HiddenSize = 64, IntermediateSize = 128, NumHiddenLayers = 2, NumAttentionHeads = 4,
            NumKeyValueHeads = 2, NumLocalExperts = modelType == "mixtral" ? 3 : null,
        };
        using var model = LlamaForCausalLM.CreateRandom(config, ScalarType.Float32, CPU, 1);
        var ids = randint(64, [1, 6]);
        var before = model.Forward(ids);
        var options = new QLoraOptions
        {
            R = 2, LoraAlpha = 4, Bnb4bitComputeDtype = "float32", Device = "cpu",
            TargetModules = modelType == "phi3" ? new[] { "qkv_proj", "gate_up_proj" } : new[] { "w1", "w2", "w3", "gate" },
        };
        using var adapter = (QLoraAdapter)new QLoraMethod().Attach(model, options);
        Assert.Equal(quantized, adapter.QuantizedPaths.Count); // every Linear but lm_head
        var layer = Assert.IsType<LoraLinear>(model.Root.get_submodule(adapted));
        Assert.IsType<Linear4bit>(layer.base_layer);
        var after = model.Forward(ids);
        var error = TinyModels.MaxAbsDiff(after, before);
        Assert.True(error > 0 && error < 0.5f * before.abs().max().item<float>(), $"4-bit base output off by {error}");
    }
}
