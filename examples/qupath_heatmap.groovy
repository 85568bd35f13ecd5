/*
 * wsi-mil heatmap -> QuPath: import the scored tiles of `<slide_id>_attention.geojson`
 * (written by `wsi-mil heatmap`) into the open image, with their measurements, and
 * colour them by one measurement (the same as Measure -> Show measurement maps).
 *
 * QuPath 0.4 or later: open the slide, then Automate -> Script editor -> File -> Open
 * this file, set HEATMAP_DIR, Run. The file is found from the image name (the slide id
 * is the file name without its extension). For a whole project: Run -> Run for project.
 *
 * Not tested by wsi-mil's test suite (QuPath is not available there).
 */
import javafx.application.Platform
import qupath.lib.color.ColorMaps
import qupath.lib.gui.tools.MeasurementMapper
import qupath.lib.io.PathIO

def HEATMAP_DIR = '/path/to/study/heatmaps'  // the `wsi-mil heatmap --out` folder
def MEASUREMENT = 'score_normalised'  // score, attention, attention_percentile, contribution
def COLOR_MAP = null                  // a QuPath colour map name (e.g. 'Viridis'); null: default
def REPLACE = true                    // remove tiles imported before

def name = getProjectEntry()?.getImageName() ?: getCurrentServer().getMetadata().getName()
def sid = GeneralTools.stripExtension(name)
def file = new File(HEATMAP_DIR, sid + '_attention.geojson')
if (!file.isFile()) {
    throw new IllegalArgumentException("No heatmap for ${name}: ${file} does not exist; " +
            "run `wsi-mil heatmap RUN --slide ${name} --out ${HEATMAP_DIR}` first")
}

def objects = PathIO.readObjects(file)
if (REPLACE) {
    removeObjects(getTileObjects(), true)
}
addObjects(objects)
def tiles = getTileObjects()
def values = tiles.collect { it.getMeasurementList().get(MEASUREMENT) }.findAll { !Double.isNaN(it) }
if (values.isEmpty()) {
    throw new IllegalArgumentException("The tiles of ${file} have no measurement '${MEASUREMENT}'")
}
print "Imported ${objects.size()} tiles from ${file}"

def viewer = getCurrentViewer()
if (viewer != null) {  // absent when run for a project without a viewer
    def colorMap = COLOR_MAP ? ColorMaps.getColorMaps()[COLOR_MAP] : ColorMaps.getDefaultColorMap()
    def mapper = new MeasurementMapper(colorMap, MEASUREMENT, tiles)
    double lo = values.min(), hi = values.max()
    if (lo < 0 && hi > 0) {  // signed scores (contributions): a range symmetric around 0
        double top = Math.max(-lo, hi)
        mapper.setDisplayMinValue(-top)
        mapper.setDisplayMaxValue(top)
    }
    Platform.runLater { viewer.getOverlayOptions().setMeasurementMapper(mapper) }
    print "Colouring by ${MEASUREMENT} (${lo} to ${hi})"
}
