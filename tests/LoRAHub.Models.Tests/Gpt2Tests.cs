using LoRAHub.Models.Generation;
using LoRAHub.Models.Gpt2;

namespace LoRAHub.Models.Tests;

public sealed class Gpt2Tests
{
    [Fact]
    public void Forward_shapes_names_and_causality()
    {
        using var scope = torch.NewDisposeScope();
        using var model = TinyModels.Gpt2();
        var keys = model.state_dict().Keys.ToHashSet();
        Assert.Contains("transformer.wte.weight", keys);
        Assert.Contains("transformer.wpe.weight", keys);
        Assert.Contains("transformer.h.1.attn.c_attn.weight", keys);
        Assert.Contains("transformer.h.0.mlp.c_fc.bias", keys);
        Assert.Contains("transformer.ln_f.weight", keys);
        Assert.DoesNotContain("lm_head.weight", keys);
        Assert.Equal([32L, 96], model.state_dict()["transformer.h.0.attn.c_attn.weight"].shape); // Conv1D: in × out
        var a = model.forward(TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5 } }));
        var b = model.forward(TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 60 } }));
        Assert.Equal([1L, 5, 64], a.shape);
        Assert.True(TinyModels.MaxAbsDiff(a.narrow(1, 0, 4), b.narrow(1, 0, 4)) < 1e-6f);
    }

    [Fact]
    public void Cached_and_padded_generation_match_single_uncached()
    {
        using var model = TinyModels.Gpt2();
        int[][] prompts = [[1, 5, 9], [4, 8, 60, 33, 12]];
        var options = new GenerationOptions { MaxNewTokens = 6 };
        var cached = TextGenerator.Generate(model, prompts, options);
        Assert.Equal(TextGenerator.Generate(model, [prompts[0]], options with { UseCache = false })[0], cached[0]);
        Assert.Equal(TextGenerator.Generate(model, [prompts[1]], options with { UseCache = false })[0], cached[1]);
    }

    [Fact]
    public void Gradient_checkpointing_gives_the_same_gradients()
    {
        using var model = TinyModels.Gpt2();
        var ids = TinyModels.Ids(new long[,] { { 1, 2, 3, 4, 5, 6 } });
        float[] Grad()
        {
            using var scope = torch.NewDisposeScope();
            model.zero_grad();
            model.ComputeLoss(ids, ids).backward();
            return model.state_dict()["transformer.h.0.attn.c_attn.weight"].grad!.data<float>().ToArray();
        }
        var plain = Grad();
        model.GradientCheckpointing = true;
        var checkpointed = Grad();
        Assert.Equal(plain.Length, checkpointed.Length);
        Assert.True(plain.Zip(checkpointed, (a, b) => Math.Abs(a - b)).Max() < 1e-6f);
    }

    [Fact]
    public void Save_then_load_round_trips()
    {
        var folder = TinyModels.TempFolder();
        try
        {
            using var scope = torch.NewDisposeScope();
            using var model = TinyModels.Gpt2(seed: 5);
            PretrainedModel.Save(model, folder);
            using var loaded = PretrainedModel.Load(folder, ScalarType.Float32, TinyModels.Device);
            Assert.IsType<Gpt2LMHeadModel>(loaded);
            var ids = TinyModels.Ids(new long[,] { { 3, 1, 4, 1, 5 } });
            Assert.True(TinyModels.Equal(model.forward(ids), loaded.Forward(ids)));
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }
}
