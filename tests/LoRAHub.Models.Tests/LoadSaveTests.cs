using System.Text.Json.Nodes;

namespace LoRAHub.Models.Tests;

public sealed class LoadSaveTests
{
    private static readonly long[,] Ids = { { 1, 5, 9, 13, 2, 40 } };

    [Theory]
    [InlineData("llama", false, 1L << 30)]
    [InlineData("qwen2", true, 1L << 30)]
    [InlineData("mistral", false, 20_000)] // sharded: several files plus the index
    public void Save_then_load_gives_identical_logits(string modelType, bool tied, long shardBytes)
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var model = TinyModels.Llama(modelType, tied, seed: 3);
            PretrainedModel.Save(model, folder, shardBytes);
            Assert.Equal(shardBytes < 100_000, File.Exists(Path.Combine(folder, "model.safetensors.index.json")));
            using var loaded = PretrainedModel.Load(folder, ScalarType.Float32, TinyModels.Device);
            Assert.Equal(modelType, loaded.ModelType);
            Assert.False(loaded.Root.training, "a loaded model is in eval mode, as from_pretrained returns it");
            Assert.True(TinyModels.Equal(model.forward(TinyModels.Ids(Ids)), loaded.Forward(TinyModels.Ids(Ids))));
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }

    [Fact]
    public void Loading_converts_the_file_dtype()
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var model = TinyModels.Llama();
            PretrainedModel.Save(model, folder);
            using var bf16 = PretrainedModel.Load(folder, ScalarType.BFloat16, TinyModels.Device);
            Assert.Equal(ScalarType.BFloat16, bf16.Root.state_dict()["model.norm.weight"].dtype);
            var expected = model.state_dict()["model.layers.0.mlp.up_proj.weight"].to(ScalarType.BFloat16);
            Assert.True(TinyModels.Equal(expected, bf16.Root.state_dict()["model.layers.0.mlp.up_proj.weight"]));
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }

    [Fact]
    public void Wrong_shape_and_missing_key_are_named_in_one_error()
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using (var model = TinyModels.Llama()) PretrainedModel.Save(model, folder);
            // The config now asks for a wider MLP than the weights have, and one more layer than was saved.
            var configPath = Path.Combine(folder, "config.json");
            var config = JsonNode.Parse(File.ReadAllText(configPath))!;
            config["intermediate_size"] = 48;
            config["num_hidden_layers"] = 3;
            File.WriteAllText(configPath, config.ToJsonString());
            var e = Assert.Throws<InvalidDataException>(() => PretrainedModel.Load(folder));
            Assert.Contains("'model.layers.0.mlp.up_proj.weight' has shape [64, 32] in the checkpoint but the model expects [48, 32]", e.Message);
            Assert.Contains("missing 'model.layers.2.self_attn.q_proj.weight'", e.Message);
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }

    [Fact]
    public void Unsupported_model_type_names_the_supported_ones()
    {
        var folder = TinyModels.TempFolder();
        try
        {
            File.WriteAllText(Path.Combine(folder, "config.json"), """{"model_type": "bert"}""");
            var e = Assert.Throws<NotSupportedException>(() => PretrainedModel.Load(folder));
            Assert.Contains("'bert'", e.Message);
            Assert.Contains("llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, gpt2", e.Message);
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }
}
