// PEFT interop matrix, our half (run by scripts/peft/interop_matrix.py; see there):
//   save  <cases.json> : per case, attach the method with the case's options (PEFT's key names), move every trained tensor
//                        off its init, save the adapter + logits.json, then merge_and_unload and save the merged model folder
//   check <cases.json> : per case, load PEFT's saved folder (the plugin that claims it) and compare with PEFT's logits.json;
//                        one JSON line per case, exit 1 if any differs by more than 1e-4
using System.Text.Json;
using LoRAHub.Models;
using LoRAHub.Tuners.Lora;

var mode = Args[0];
var doc = JsonDocument.Parse(File.ReadAllText(Args[1]));
var failed = 0;
foreach (var c in doc.RootElement.EnumerateArray())
{
    var name = c.GetProperty("name").GetString()!;
    var ids = c.GetProperty("ids").EnumerateArray().Select(e => e.GetInt64()).ToArray();
    using var model = PretrainedModel.Load(c.GetProperty("base").GetString()!, device: CPU);
    float[] Logits()
    {
        using var scope = torch.NewDisposeScope();
        using var _ = torch.no_grad();
        return model.Forward(torch.tensor(ids, [1, ids.Length])).reshape(-1).to(torch.ScalarType.Float32).data<float>().ToArray();
    }
    if (mode == "save")
    {
        try
        {
            torchx.manual_seed(11);
            var adapter = Method(c.GetProperty("method").GetString()!).Attach(model, c.GetProperty("options").GetRawText());
            using (torch.no_grad())
                foreach (var p in adapter.ParameterGroups(0, 0).SelectMany(g => g.Parameters)) p.add_(torch.randn(p.shape) * 0.05);
            adapter.SetTraining(false);
            var folder = c.GetProperty("ours").GetString()!;
            // PEFT's path_initial_model_for_weight_conversion: a PiSSA adapter saved as plain LoRA for the original base.
            if (c.GetProperty("convert").GetBoolean()) ((LoraAdapter)adapter).SaveAdapter(folder, LoraAdapter.DefaultName, convertToLora: true);
            else adapter.Save(folder);
            File.WriteAllText(Path.Combine(folder, "logits.json"), JsonSerializer.Serialize(new { input_ids = ids, logits = Logits() }));
            adapter.MergeAndUnload();
            PretrainedModel.Save(model, c.GetProperty("merged").GetString()!);
            Output($"{name}: saved");
        }
        catch (Exception e)
        {
            // The Python side reports the case as failed (no logits.json or no merged folder); the others go on.
            Output($"{name}: FAILED to save: {e.Message}");
        }
        continue;
    }
    var peftFolder = c.GetProperty("peft").GetString()!;
    try
    {
        var claimed = Methods.ForFolder(peftFolder);
        using var adapter = claimed.Load(model, peftFolder);
        adapter.SetTraining(false);
        using var expectedDoc = JsonDocument.Parse(File.ReadAllText(Path.Combine(peftFolder, "logits.json")));
        var expected = expectedDoc.RootElement.GetProperty("logits").EnumerateArray().Select(e => e.GetSingle()).ToArray();
        var ours = Logits();
        var diff = expected.Zip(ours).Max(p => Math.Abs(p.First - p.Second));
        float[] baseline;
        using (adapter.DisableAdapter()) baseline = Logits();
        var moved = expected.Zip(baseline).Max(p => Math.Abs(p.First - p.Second));
        var ok = diff < 1e-4 && moved > 1e-3 && claimed.Name == c.GetProperty("method").GetString();
        if (!ok) failed++;
        Console.WriteLine(JsonSerializer.Serialize(new { @case = name, check = "peft adapter in lorahub", method = claimed.Name, max_abs_logit_diff = diff,
            adapter_moves_logits_by = moved, ok }));
    }
    catch (Exception e)
    {
        failed++;
        Console.WriteLine(JsonSerializer.Serialize(new { @case = name, check = "peft adapter in lorahub", error = e.Message, ok = false }));
    }
}
if (failed > 0) throw new Exception($"{failed} PEFT-saved adapter(s) do not match here");
