// milcli's slide viewer: the slide's Deep Zoom tiles, the explain maps as overlays, the regions'
// outlines, and a click on a patch showing its values. Everything it reads is either inline
// (window.MILCLI, written by mil_cli/viewer.py) or an <img>, so it works from file:// offline.
(function () {
  "use strict";
  const d = window.MILCLI;
  const p = d.pyramid;
  const present = new Set(d.tiles);
  const state = { viewer: null, tilesLoaded: 0, items: {}, selected: null };
  window.milcliViewer = state;

  const viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: d.assets + "images/",
    drawer: "canvas",            // the WebGL drawer cannot upload file:// images (tainted textures)
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 4,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
    tileSources: {
      width: p.width, height: p.height, tileSize: p.tileSize, tileOverlap: 0, minLevel: 0, maxLevel: p.maxLevel,
      getTileUrl: (level, x, y) => present.has(`${level}/${x}_${y}`)
        ? `${d.folder}tiles/${level}/${x}_${y}.jpg` : `${d.assets}glass.png`,
    },
  });
  state.viewer = viewer;
  viewer.addHandler("tile-loaded", () => { state.tilesLoaded += 1; });

  const opacity = document.getElementById("opacity");
  const alpha = () => Number(opacity.value) / 100;

  viewer.addHandler("open", () => {
    d.overlays.forEach((overlay, index) => {
      viewer.addTiledImage({
        tileSource: { type: "image", url: d.folder + overlay.file, buildPyramid: false },
        x: 0, y: 0, width: overlay.width0 / d.width0, index: index + 1,
        opacity: overlay.visible ? alpha() : 0,
        success: (event) => { state.items[overlay.name] = event.item; },
      });
    });
    addRegions();
  });

  function setOverlayOpacity() {
    d.overlays.forEach((overlay) => {
      const item = state.items[overlay.name];
      const box = document.getElementById(`overlay-${overlay.name}`);
      if (item) item.setOpacity(box.checked ? alpha() : 0);
    });
  }
  d.overlays.forEach((overlay) => {
    document.getElementById(`overlay-${overlay.name}`).addEventListener("change", setOverlayOpacity);
  });
  opacity.addEventListener("input", setOverlayOpacity);

  const SVG = "http://www.w3.org/2000/svg";
  function addRegions() {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", `0 0 ${d.width0} ${d.height0}`);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.id = "regions";
    d.regions.forEach((rings) => {
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("d", rings.map((ring) => "M" + ring.map((pt) => pt.join(" ")).join("L") + "Z").join(""));
      path.setAttribute("class", "region");
      svg.appendChild(path);
    });
    viewer.addOverlay({ element: svg, location: new OpenSeadragon.Rect(0, 0, 1, d.height0 / d.width0) });
    const box = document.getElementById("show-regions");
    box.addEventListener("change", () => { svg.style.display = box.checked ? "" : "none"; });
  }

  // the patch under a level-0 point: of the patches covering it, the one whose centre is nearest
  function patchAt(x, y) {
    const s = d.patches.size;
    let best = -1, bestDistance = Infinity;
    for (let i = 0; i < d.patches.x.length; i++) {
      const dx = x - d.patches.x[i], dy = y - d.patches.y[i];
      if (dx >= 0 && dy >= 0 && dx < s && dy < s) {
        const distance = (dx - s / 2) ** 2 + (dy - s / 2) ** 2;
        if (distance < bestDistance) { best = i; bestDistance = distance; }
      }
    }
    return best;
  }

  const marker = document.createElement("div");
  marker.id = "selected-patch";
  const panel = document.getElementById("patch-info");
  function show(i) {
    state.selected = i;
    if (i < 0) {
      panel.textContent = "no patch here (not tissue, or left out by tiling)";
      viewer.removeOverlay(marker);
      return;
    }
    const s = d.patches.size, x = d.patches.x[i], y = d.patches.y[i];
    const rows = [["patch", `#${i + 1} of ${d.patches.x.length} at x=${x}, y=${y} (level-0 px, ${s} px wide)`],
                  ["attention", `${d.patches.attention[i].toPrecision(4)} (rank ${d.patches.rank[i].toFixed(1)} %)`]];
    Object.entries(d.patches.columns).forEach(([name, values]) => rows.push([name, values[i].toPrecision(4)]));
    panel.replaceChildren(...rows.map(([k, v]) => {
      const row = document.createElement("div");
      row.innerHTML = "<b></b> <span></span>";
      row.children[0].textContent = k + ":";
      row.children[1].textContent = v;
      return row;
    }));
    const location = new OpenSeadragon.Rect(x / d.width0, y / d.width0, s / d.width0, s / d.width0);
    if (viewer.getOverlayById(marker)) viewer.updateOverlay(marker, location);
    else viewer.addOverlay({ element: marker, location: location });
  }
  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick) return;
    const point = viewer.viewport.pointFromPixel(event.position);
    show(patchAt(point.x * d.width0, point.y * d.width0));
  });
})();
