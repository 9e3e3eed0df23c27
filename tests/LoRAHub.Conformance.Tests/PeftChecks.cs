using LoRAHub.Models;
using LoRAHub.Models.Generation;
using static LoRAHub.Conformance.Tests.Fixture;

namespace LoRAHub.Conformance.Tests;

/// <summary>
/// PEFT's generic checks (tests/testing_common.py) for every method plugin, on a tiny Llama in fp32: a method that cannot
/// take a check says why in <see cref="MethodCase"/>, and the check then asserts that the method refuses it.
/// </summary>
public class PeftChecks
{
    public static TheoryData<string> Methods => MethodCase.Names();

    private static (ICausalLanguageModel model, IAdapter adapter) Attach(MethodCase method, bool saved = false, List<int>? layers = null,
        ScalarType dtype = ScalarType.Float32)
    {
        var model = Base(dtype);
        var adapter = method.Create().Attach(model, method.Options(dtype, saved && method.NoModulesToSave is null, layers));
        Perturb(adapter);
        adapter.SetTraining(false);
        return (model, adapter);
    }

    [Theory, MemberData(nameof(Methods))]
    public void Save_then_load_reproduces_the_outputs_under_another_seed_and_writes_only_adapter_files(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method, saved: true);
        using var _ = model;
        using var __ = adapter;
        var ids = Ids();
        var expected = Logits(model, ids);
        var dir = Temp();
        adapter.Save(dir);

        foreach (var file in Directory.GetFiles(dir).Select(Path.GetFileName))
            Assert.True(file!.EndsWith(".json", StringComparison.Ordinal) || file == AdapterWeightsFile.FileName, $"unexpected file {file}");
        var saved = torchx.load_safetensors(Path.Combine(dir, AdapterWeightsFile.FileName), CPU);
        Assert.Equal(adapter.StateDict().Values.Sum(t => t.numel()), saved.Values.Sum(t => t.numel()));
        Assert.DoesNotContain(saved.Keys, k => k.Contains(".base_layer.", StringComparison.Ordinal));
        using (var plain = Base()) // a quantizing method's model holds its base in buffers, so count the fixture's
            Assert.True(saved.Values.Sum(t => t.numel()) < plain.parameters().Sum(p => p.numel()) / 2, "the adapter file holds the base model");

        torchx.manual_seed(12345); // the load must not depend on the generator
        using var fresh = Base();
        using var loaded = method.Create().Load(fresh, dir);
        loaded.SetTraining(false);
        Close(expected, Logits(fresh, ids), 1e-5, $"{name}: loaded vs saved");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Merged_unmerged_and_merge_and_unload_agree_and_differ_from_the_base(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method);
        using var _ = model;
        using var __ = adapter;
        var ids = Ids();
        if (method.NoMerge is not null)
        {
            Assert.False(adapter.CanMerge, method.NoMerge);
            Assert.ThrowsAny<Exception>(() => adapter.MergeAndUnload());
            return;
        }
        using var reference = Reference(method, model);
        var baseline = Logits(reference, ids);
        var unmerged = Logits(model, ids);
        Assert.True((unmerged - baseline).abs().max().item<float>() > 1e-3, $"{name}: the adapter does not change the output");
        if (method.NoInPlaceMerge is null)
        {
            adapter.Merge();
            Close(unmerged, Logits(model, ids), 1e-4, $"{name}: merged vs unmerged");
            adapter.Unmerge();
            Close(unmerged, Logits(model, ids), 1e-4, $"{name}: unmerged again");
        }
        else Assert.ThrowsAny<InvalidOperationException>(() => adapter.Merge());
        var plain = (ICausalLanguageModel)adapter.MergeAndUnload();
        Assert.Empty(AdapterLayers(plain));
        Close(unmerged, Logits(plain, ids), 1e-4, $"{name}: merge_and_unload vs unmerged");
    }

    [Theory, MemberData(nameof(Methods))]
    public void A_saved_merged_folder_reloads_with_the_same_logits(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method, saved: true);
        using var _ = model;
        using var __ = adapter;
        if (method.NoMerge is not null) return; // see the merge check: refused with the reason
        var ids = Ids();
        var plain = (ICausalLanguageModel)adapter.MergeAndUnload();
        var merged = Logits(plain, ids);
        var dir = Temp();
        PretrainedModel.Save(plain, dir);
        using var reloaded = PretrainedModel.LoadLlama(dir);
        Close(merged, Logits(reloaded, ids), 1e-5, $"{name}: merged folder");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Inside_the_disable_scope_the_output_is_the_base_output(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method, saved: true);
        using var _ = model;
        using var __ = adapter;
        var ids = Ids();
        using var reference = Reference(method, model);
        var baseline = Logits(reference, ids);
        var adapted = Logits(model, ids);
        using (adapter.DisableAdapter()) Close(baseline, Logits(model, ids), method.Quantizes ? 1e-5 : 1e-6, $"{name}: disabled");
        Close(adapted, Logits(model, ids), 1e-6, $"{name}: enabled again");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Training_changes_only_adapter_and_modules_to_save_parameters_with_checkpointing_and_layers_to_transform(string name)
    {
        var method = MethodCase.Get(name);
        using var model = Base();
        model.GradientCheckpointing = true;
        using var adapter = method.Create().Attach(model, method.Options(ScalarType.Float32, method.NoModulesToSave is null, [1]));
        // Adapter layers only in layer 1.
        Assert.NotEmpty(AdapterLayers(model));
        Assert.All(AdapterLayers(model), p => Assert.Contains(".layers.1.", p));
        var trainable = Trainable(adapter).ToHashSet(ReferenceEqualityComparer.Instance);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        adapter.SetTraining(true);
        var ids = Ids();
        for (var step = 0; step < 3; step++)
        {
            adapter.OnStepBegin(step);
            using (var scope = NewDisposeScope())
            {
                var loss = model.ComputeLoss(ids, ids);
                if (adapter.AuxiliaryLoss() is { } aux) loss = loss + aux;
                loss.backward();
            }
            adapter.OnAfterBackward(step);
            using (no_grad())
                foreach (var p in trainable.Cast<Tensor>())
                    if (p.grad is { } g)
                    {
                        p.sub_(g.mul(0.05));
                        g.zero_();
                    }
            adapter.OnStepEnd(step);
        }
        var changed = 0;
        foreach (var (pname, p) in model.named_parameters())
        {
            if (trainable.Contains(p))
            {
                if (before.TryGetValue(pname, out var old) && !old.Equals(p)) changed++;
                continue;
            }
            Assert.True(before[pname].Equals(p), $"{name}: frozen parameter {pname} changed in training");
        }
        Assert.True(changed > 0, $"{name}: no trainable parameter changed");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Unload_and_delete_restore_the_base(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method, saved: true);
        using var _ = model;
        var ids = Ids();
        using var reference = Reference(method, model);
        var baseline = Logits(reference, ids);
        var tolerance = method.Quantizes ? 1e-5 : 1e-6;
        if (adapter is IAdapterSet set)
        {
            var dir = Temp();
            adapter.Save(dir);
            set.LoadAdapter(dir, "second");
            foreach (var adapterName in set.AdapterNames.ToList()) set.DeleteAdapter(adapterName);
            Assert.Empty(set.AdapterNames);
            Close(baseline, Logits(model, ids), tolerance, $"{name}: every adapter deleted");
        }
        var plain = (ICausalLanguageModel)adapter.Unload();
        Assert.Empty(AdapterLayers(plain));
        Close(baseline, Logits(plain, ids), tolerance, $"{name}: unloaded");
        adapter.Dispose();
    }

    [Theory, MemberData(nameof(Methods))]
    public void A_mixed_batch_equals_each_adapter_run_alone(string name)
    {
        var method = MethodCase.Get(name);
        var (model, adapter) = Attach(method);
        using var _ = model;
        using var __ = adapter;
        if (method.NoAdapterSet is not null)
        {
            // No named adapters, or (LongLoRA) a set whose adapters always carry modules_to_save: refused with the reason.
            if (adapter is IAdapterSet refusing) Assert.Throws<NotSupportedException>(() => refusing.UseAdapterPerRow([LoraAdapter.DefaultName]));
            return;
        }
        var set = (IAdapterSet)adapter;
        var ids = Ids(batch: 3);
        var dir = Temp();
        adapter.Save(dir);
        Perturb(adapter, seed: 99); // "default" moves on; "saved" keeps the saved state
        set.LoadAdapter(dir, "saved");
        var current = Logits(model, ids);
        using var reference = Reference(method, model);
        var baseline = Logits(reference, ids);
        using var fresh = Base();
        using var alone = method.Create().Load(fresh, dir);
        alone.SetTraining(false);
        var saved = Logits(fresh, ids);
        Tensor mixed;
        using (set.UseAdapterPerRow(["saved", IAdapterSet.BaseName, LoraAdapter.DefaultName])) mixed = Logits(model, ids);
        Close(saved[0], mixed[0], 1e-5, $"{name}: row of 'saved'");
        Close(baseline[1], mixed[1], 1e-5, $"{name}: base row");
        Close(current[2], mixed[2], 1e-5, $"{name}: row of 'default'");
    }

    [Theory, MemberData(nameof(Methods))]
    public void Generation_works_in_fp32_and_bf16(string name)
    {
        var method = MethodCase.Get(name);
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            var (model, adapter) = Attach(method, dtype: dtype);
            using var _ = model;
            using var __ = adapter;
            // bf16 matmuls are slow on CPU: one short row there.
            int[][] prompts = dtype == ScalarType.Float32 ? [[1, 5, 9, 3], [1, 7]] : [[1, 5, 9]];
            var tokens = dtype == ScalarType.Float32 ? 4 : 2;
            var cached = TextGenerator.Generate(model, prompts, new GenerationOptions { MaxNewTokens = tokens });
            Assert.All(cached, row => Assert.Equal(tokens, row.Length));
            Assert.All(cached.SelectMany(r => r), t => Assert.InRange(t, 0, 63));
            if (dtype != ScalarType.Float32) continue;
            // fp32: greedy decoding with the KV cache equals recomputing the whole prefix each step.
            var uncached = TextGenerator.Generate(model, prompts, new GenerationOptions { MaxNewTokens = tokens, UseCache = false });
            Assert.Equal(uncached, cached);
        }
    }
}
