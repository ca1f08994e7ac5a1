// relayd serves this page with `style-src 'self'`: no inline styles. xterm.js 6
// writes part of its stylesheet into <style> elements it creates (theme colours,
// row sizes, scrollbar), and 24-bit colours into style="" attributes; a browser
// enforcing that policy ignores both. The CSS Object Model is not restricted by
// CSP, so this routes both through it, before xterm.js creates anything:
//   - document.createElement('style') returns an inert <template> stand-in (even an
//     empty <style> in the document is a violation) whose textContent goes to a
//     constructed stylesheet adopted by the document, removed with the element;
//   - setAttribute('style', v) on an HTML element becomes element.style.cssText = v.
// The result is the same cascade, with no CSP violation and no 'unsafe-inline'.

export function installCspStyleShim(doc = document) {
  if (doc.relaydCspShim) return;
  doc.relaydCspShim = true;

  const createElement = doc.createElement.bind(doc);
  doc.createElement = function createElementCspSafe(tagName, options) {
    if (String(tagName).toLowerCase() !== 'style') return createElement(tagName, options);
    const standIn = createElement('template');
    standIn.dataset.relaydStyle = '';
    adoptStyleElement(doc, standIn);
    return standIn;
  };

  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function setAttributeCspSafe(name, value) {
    if (this instanceof HTMLElement && String(name).toLowerCase() === 'style') {
      this.style.cssText = String(value);
      return;
    }
    setAttribute.call(this, name, value);
  };
}

function adoptStyleElement(doc, element) {
  const sheet = new CSSStyleSheet();
  let text = '';
  Object.defineProperty(element, 'textContent', {
    configurable: true,
    get() {
      return text;
    },
    set(value) {
      text = value == null ? '' : String(value);
      sheet.replaceSync(text);
    },
  });
  const remove = element.remove.bind(element);
  element.remove = function removeCspSafe() {
    doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet);
    remove();
  };
  doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
}
