using System.Globalization;
using System.Text;

namespace LoRAHub.Training.Reporting;

/// <summary>Draws training loss, eval loss and learning rate against step as an SVG image (no drawing library needed).</summary>
public static class LossPlot
{
    public static void Write(string path, IReadOnlyList<StepMetrics> records)
    {
        const int w = 800, h = 420, left = 60, right = 60, top = 30, bottom = 40;
        var train = records.Where(r => !r.Skipped && double.IsFinite(r.Loss)).ToList();
        var svg = new StringBuilder();
        string F(double v) => v.ToString("0.##", CultureInfo.InvariantCulture);
        svg.AppendLine($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
        svg.AppendLine($"<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
        if (train.Count > 0)
        {
            double x0 = train.Min(r => r.Step), x1 = Math.Max(x0 + 1, train.Max(r => r.Step));
            var losses = train.Select(r => r.Loss).Concat(records.Where(r => r.EvalLoss.HasValue).Select(r => r.EvalLoss!.Value)).ToList();
            double y0 = Math.Min(0, losses.Min()), y1 = Math.Max(y0 + 1e-9, losses.Max());
            double lr1 = Math.Max(1e-12, train.Max(r => r.LearningRate));
            double X(double s) => left + (s - x0) / (x1 - x0) * (w - left - right);
            double Y(double v) => h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom);
            double Ylr(double v) => h - bottom - v / lr1 * (h - top - bottom);
            string Line(IEnumerable<(double x, double y)> pts, string color, string dash = "") =>
                $"<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" {dash} points=\"{string.Join(" ", pts.Select(p => $"{F(p.x)},{F(p.y)}"))}\"/>";
            svg.AppendLine($"<line x1=\"{left}\" y1=\"{h - bottom}\" x2=\"{w - right}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
            svg.AppendLine($"<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{h - bottom}\" stroke=\"black\"/>");
            svg.AppendLine(Line(train.Select(r => (X(r.Step), Y(r.Loss))), "#1f77b4"));
            var evals = records.Where(r => r.EvalLoss.HasValue).ToList();
            if (evals.Count > 0) svg.AppendLine(Line(evals.Select(r => (X(r.Step), Y(r.EvalLoss!.Value))), "#d62728"));
            svg.AppendLine(Line(train.Select(r => (X(r.Step), Ylr(r.LearningRate))), "#2ca02c", "stroke-dasharray=\"4 3\""));
            svg.AppendLine($"<text x=\"{left}\" y=\"{h - 10}\">step {F(x0)}</text><text x=\"{w - right - 60}\" y=\"{h - 10}\">step {F(x1)}</text>");
            svg.AppendLine($"<text x=\"5\" y=\"{top + 5}\">{F(y1)}</text><text x=\"5\" y=\"{h - bottom}\">{F(y0)}</text>");
            svg.AppendLine($"<text x=\"{w - right + 5}\" y=\"{top + 5}\">lr {lr1:0.##e0}</text>");
        }
        svg.AppendLine($"<text x=\"{left + 10}\" y=\"18\"><tspan fill=\"#1f77b4\">train loss</tspan>  <tspan fill=\"#d62728\">eval loss</tspan>  <tspan fill=\"#2ca02c\">learning rate</tspan></text>");
        svg.AppendLine("</svg>");
        var temp = path + ".tmp";
        File.WriteAllText(temp, svg.ToString());
        File.Move(temp, path, overwrite: true);
    }
}
