using LoRAHub.Models;
using LoRAHub.Plugins.DoRA;
using LoRAHub.Plugins.LoRA;
using LoRAHub.Plugins.QLoRA;

namespace LoRAHub.Conformance.Tests;

/// <summary>
/// PEFT's generic checks on models with tied embeddings (tie_word_embeddings), for the options PEFT accepts there:
/// modules_to_save=["lm_head"] (an untied trainable copy of the head) and trainable_token_indices (rows of the shared
/// table, followed by the head). Training changes only the adapter, the copy or the rows; save → load reproduces the
/// outputs; unload gives the tied base back.
/// </summary>
public class TiedModelChecks
{
    private static string FixtureDir(string family) => Path.Combine(Path.GetDirectoryName(Fixture.LlamaDir)!, family);

    public static TheoryData<string, string, string> Cases()
    {
        var data = new TheoryData<string, string, string>();
        foreach (var family in new[] { "llama_tied", "gpt2" })
        {
            var targets = family == "gpt2" ? "[\"c_attn\", \"c_fc\"]" : "[\"q_proj\", \"v_proj\", \"down_proj\"]";
            var common = $"\"r\": 4, \"lora_alpha\": 8, \"target_modules\": {targets}, \"init_lora_weights\": false";
            foreach (var method in new[] { "lora", "dora", "qlora" })
            {
                data.Add(family, method, $"{{{common}, \"modules_to_save\": [\"lm_head\"]}}");
                data.Add(family, method, $"{{{common}, \"trainable_token_indices\": [1, 2, 7]}}");
            }
        }
        return data;
    }

    private static IAdapterMethod Method(string name) => name switch
    {
        "dora" => new DoraMethod(),
        "qlora" => new QLoraMethod(),
        _ => new LoraMethod(),
    };

    private static string WithMethodFields(string method, string json) =>
        method == "qlora" ? json[..^1] + ", \"device\": \"cpu\", \"bnb_4bit_compute_dtype\": \"float32\"}" : json;

    [Theory, MemberData(nameof(Cases))]
    public void Training_changes_only_the_adapter_and_save_then_load_reproduces_the_outputs(string family, string method, string json)
    {
        var ids = Fixture.Ids(batch: 2, length: 10);
        using var model = (ICausalLanguageModel)PretrainedModel.Load(FixtureDir(family));
        model.GradientCheckpointing = true;
        using var adapter = Method(method).Attach(model, WithMethodFields(method, json));
        var trainable = Fixture.Trainable(adapter).ToHashSet(ReferenceEqualityComparer.Instance);
        var before = model.Root.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        var extraBefore = trainable.Cast<Tensor>().Where(t => !model.Root.parameters().Any(p => ReferenceEquals(p, t)))
            .Select(t => (t, t.detach().clone())).ToList();
        adapter.SetTraining(true);
        for (var step = 0; step < 2; step++)
        {
            adapter.OnStepBegin(step);
            using (var scope = NewDisposeScope()) model.ComputeLoss(ids, ids).backward();
            using (no_grad())
                foreach (var p in trainable.Cast<Tensor>())
                    if (p.grad is { } g)
                    {
                        p.sub_(g.mul(0.5));
                        g.zero_();
                    }
            adapter.OnStepEnd(step);
        }
        model.GradientCheckpointing = false;
        foreach (var (name, p) in model.Root.named_parameters())
            if (!trainable.Contains(p))
                Assert.True(before[name].Equals(p), $"{family} {method}: frozen parameter {name} changed in training");
        // The head copy or the token rows (not model parameters while the adapter is off) trained too.
        var saved = json.Contains("modules_to_save") ? "lm_head.weight" : "token_adapter.trainable_tokens_delta";
        var extra = adapter.StateDict().Single(kv => kv.Key.EndsWith(saved, StringComparison.Ordinal)).Value;
        Assert.Contains(extra, trainable.Cast<Tensor>());
        if (extraBefore.FirstOrDefault(e => ReferenceEquals(e.t, extra)) is { t: not null } tracked)
            Assert.False(tracked.Item2.Equals(extra), $"{family} {method}: {saved} did not train");

        var adapted = Fixture.Logits(model, ids);
        var dir = Fixture.Temp();
        adapter.Save(dir);
        using var fresh = PretrainedModel.Load(FixtureDir(family));
        IAdapterMethod[] methods = [new LoraMethod(), new DoraMethod(), new QLoraMethod()];
        using var loaded = AdapterFolder.Claimant(methods, dir).Load(fresh, dir);
        Fixture.Close(adapted, Fixture.Logits(fresh, ids), 1e-5, $"{family} {method} {json}");
    }

    [Theory]
    [InlineData("llama_tied")]
    [InlineData("gpt2")]
    public void Unload_gives_the_tied_base_back(string family)
    {
        using var model = PretrainedModel.Load(FixtureDir(family));
        var ids = Fixture.Ids(batch: 1);
        var before = Fixture.Logits(model, ids);
        var names = model.Root.named_parameters().Select(p => p.name).ToList();
        var targets = family == "gpt2" ? "[\"c_attn\"]" : "[\"q_proj\"]";
        var adapter = new LoraMethod().Attach(model, $"{{\"target_modules\": {targets}, \"modules_to_save\": [\"lm_head\"]}}");
        Fixture.Perturb(adapter);
        Assert.True((Fixture.Logits(model, ids) - before).abs().max().item<float>() > 1e-3);
        adapter.Dispose();
        Assert.Equal(names, model.Root.named_parameters().Select(p => p.name));
        Fixture.Close(before, Fixture.Logits(model, ids), 0, "unloaded");
        Assert.True(((ITiedOutputHead)model).OutputHeadTied);
    }
}
